from easydict import EasyDict as edict

# ms1mv3_r50: r50 on ms1m-retinaface-t1 (93,431 identities, 5,179,510 images)
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 0.0005
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
