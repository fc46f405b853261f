"""Readers with their records listed (pickled) and the 160x128 cache copied under a data path that does not exist,
so that the device machine, which has no data folder, reads every image from the carried cache."""
import pickle, shutil, sys
from pathlib import Path
from landmark_bench.data.registry import get_reader
from landmark_bench.data.cache import cache_folder, default_cache_dir

REAL, FAKE, OUT = "/work/shared/data", "/data-not-here/data", Path(sys.argv[1])
SIZE = (160, 128)
readers = {}
for name in ("isbi2015", "aasce2019", "hand", "chest"):
    reader = get_reader(name, REAL)
    splits = reader.splits if name == "isbi2015" else ("train", "val")
    for split in splits:
        reader.records(split)
    source = cache_folder(reader, SIZE)
    reader.data_dir = Path(FAKE)
    target = cache_folder(reader, SIZE, OUT / "cache")
    target.mkdir(parents=True, exist_ok=True)
    ids = {r.image_id for split in splits for r in reader.records(split)}
    missing = [i for i in ids if not (source / f"{i}.npy").is_file()]
    assert not missing, (name, missing[:3])
    for i in ids:
        shutil.copy(source / f"{i}.npy", target / f"{i}.npy")
    readers[name] = reader
    print(name, len(ids))
(OUT / "readers.pkl").write_bytes(pickle.dumps(readers))
