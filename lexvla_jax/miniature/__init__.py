"""The embedded main job's preparation: synthetic set, tokenizer, stage 0 and stage 1, their Hugging Face exports.

`lexvla train` runs `prepare.prepare` before the training loop when the config has a `miniature` section;
the loop and the library modules never import this package.
"""
