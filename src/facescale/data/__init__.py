"""facescale.data: InsightFace RecordIO without MXNet, WebDataset tar shards (local or remote),
image folders, synthetic data, the training loader (sequential shuffled or random reading, one
share per rank) and converters."""

from facescale.data.bin_format import load_verification_bin, write_verification_bin
from facescale.data.image import decode_image
from facescale.data.loader import TrainLoader, build_train_loader
from facescale.data.recordio import IndexedRecordFile, IndexedRecordWriter, RecordError
from facescale.data.records import ImageRecord, pack_record, unpack_record

__all__ = [
    "ImageRecord",
    "IndexedRecordFile",
    "IndexedRecordWriter",
    "RecordError",
    "TrainLoader",
    "build_train_loader",
    "decode_image",
    "load_verification_bin",
    "pack_record",
    "unpack_record",
    "write_verification_bin",
]
