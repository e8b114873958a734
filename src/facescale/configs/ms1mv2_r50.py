from _r50_recipe import config as recipe
from easydict import EasyDict as edict

# ms1mv2_r50: r50 on faces_emore (85,742 identities, 5,822,653 images)
config = edict(recipe)
config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
