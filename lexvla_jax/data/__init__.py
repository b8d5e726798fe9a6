"""Input pipeline: sources, transforms, batching with exact bad-sample counts, evaluation sets.

config.py      every data setting (`default_data_config`) and shard globs → file lists
records.py     raw samples, skip reasons, the ArrayRecord record layout
tar_reader.py  streaming tar reader: webdataset samples with resumable byte offsets
webdataset.py  resumable grain source over tar shards (per-process, per-worker shard split)
shuffle.py     window shuffle whose state is a position
array_record.py  webdataset → ArrayRecord conversion and the globally shuffled ArrayRecord source
transforms.py  decode, RGB, crops, flip, tokenise (runs in grain workers; no JAX)
batching.py    batches carrying skip counts; totals in the consumer's iterator state
pipeline.py    config → this process's checkpointable batch iterator (host side)
device_batch.py  per-process rows → global jax.Arrays
eval_set.py    image-text eval sets (webdataset, Karpathy json, TFDS array_record, CLIP_benchmark) read whole;
               the evaluation transform
seg_set.py     segmentation sets for PatchDis (VOC layout, COCO instances, webdataset masks)
class_set.py   classification sets for zero-shot classification (CLIP_benchmark, labelled webdataset)
clip_benchmark.py  CLIP_benchmark's webdataset layout (nshards.txt, N.tar, classnames, templates)
masks.py       class-mask PNGs (VOC palette) and their evaluation crop
"""
