"""The training library of the train and pretrain stages (no main(): the stages are stages/train.py and
stages/pretrain.py).

    config.py       TrainConfig, PretrainConfig: params.yaml's train: and pretrain: sections, typed; each field carries
                    its Param and whether it is part of the resume identity (the stages' SCHEMA derive from them)
    examples.py     conversations -> token ids with the reply-only mask, examples and their stats, rows a batch
    loaders.py      a base model loaded for training (Loading: what loading reads), one function per backend
    trainer.py      the one build_trainer (SFTTrainer counting tokens), its arguments and checks, FSDP
    callbacks.py    dvclive logging and the progress bar
    run.py          training_run: staging -> dvclive -> trainer -> train -> save -> reports -> timings, for both stages
    checkpoints.py  train.resume: the run's identity, whole checkpoints, preparing --checkpoints
"""
