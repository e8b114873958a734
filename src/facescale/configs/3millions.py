from easydict import EasyDict as edict

# Speed test: r50 with Partial FC 0.1 over 3,000,000 synthetic identities (no data needed).
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.1
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 10000000
config.frequent = 10
config.rec = "synthetic"
config.num_classes = 3_000_000
config.num_image = 10_000_000
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = []
