from easydict import EasyDict as edict

# A few-minute CPU run on synthetic data: the smallest backbone and a Partial FC head.
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.embedding_size = 128
config.sample_rate = 0.5
config.fp16 = False
config.batch_size = 32
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.rec = "synthetic"
config.num_classes = 200
config.num_image = 2048
config.num_epoch = 1
config.warmup_epoch = 0
config.num_workers = 0
config.frequent = 5
config.verbose = 1000
config.val_targets = []
