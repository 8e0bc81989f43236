"""Training for cxr-triage: the paper's CAE pretraining and gradual-unfreezing fine-tune, on CPU or GPU(s).

Commands: ``python -m training pack|pretrain|finetune|evaluate|ablation|oneshot|report`` (docs/TRAINING.md).
This package imports no DICOM library: a GPU host needs only torch, torchvision (numpy) and the repository;
tqdm (progress bars) and matplotlib (PNG plots; ``report`` redraws them later) are used when present, and Pillow
only to build packs smaller. The runtime (``cxr_triage``) never imports it.
"""
