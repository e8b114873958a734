from easydict import EasyDict as edict

# The built-in demo (`facescale demo`): synthetic identities, MobileFaceNet, Partial FC on CPU.
# `facescale demo` fills in `rec`, `num_classes`, `num_image` and `output`.
config = edict()
config.margin_list = (1.0, 0.0, 0.35)
config.scale = 32.0
config.network = "mbf"
config.embedding_size = 128
config.sample_rate = 0.5
config.fp16 = False
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 32
config.num_epoch = 3
config.warmup_epoch = 0.5
config.num_workers = 1
config.frequent = 10
config.verbose = 100000
config.checkpoint_every = 0
config.val_targets = ["heldout"]
