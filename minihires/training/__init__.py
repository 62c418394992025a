"""Training and scoring: the loop, the test-split evaluation, run folders, DDP, ablations,
encoder pretraining.

    train        TrainConfig and the training loop (single process or torchrun DDP)
    evaluate     greedy answers on the test split, the results table
    checkpoint   run folders: config, weights, optimizer state, written atomically
    distributed  the process-group lifecycle under torchrun
    ablate       the ablation variants and their table
    pretrain_vit the tiny ViT taught the entities before the main job (`train --vit-init`)
"""
