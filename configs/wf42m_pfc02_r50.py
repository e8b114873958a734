from easydict import EasyDict as edict

# wf42m_pfc02_r50: r50 on WebFace42M (2,059,906 identities, 42,474,557 images)
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 0.0005
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
