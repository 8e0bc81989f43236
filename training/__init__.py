"""Training for cxr-triage: the paper's CAE pretraining and gradual-unfreezing fine-tune, on CPU or GPU(s).

Commands: ``python -m training pack|pretrain|finetune|evaluate|ablation|oneshot`` (docs/TRAINING.md).
This package imports no DICOM library: a GPU host needs only torch, torchvision, numpy, tqdm, matplotlib and the
repository. The runtime (``cxr_triage``) never imports it.
"""
