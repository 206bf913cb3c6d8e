"""`python -m robust_admm.shards` (or `robust-admm shards`): writes a folder of images in
the ImageFolder layout (DIR/train/<class>/*, DIR/val/<class>/*) as ArrayRecord shards, each
image's header checked on the way (data/shards.py).

    python -m robust_admm.shards --folder DIR --out SHARDS [--records_per_shard 1024]
"""
from absl import app, flags, logging

from robust_admm import cli
from robust_admm.data.folder import list_image_folder
from robust_admm.data.shards import write_shards
from robust_admm.runtime import logs

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags (defined by the entry point only)."""
    flags.DEFINE_string("folder", None, "The image folder (train/<class>/*, val/<class>/*).")
    flags.DEFINE_string("out", None, "A new folder for the shards and their index.json.")
    flags.DEFINE_integer("records_per_shard", 1024, "Records per shard file.")
    flags.mark_flags_as_required(["folder", "out"])


def convert(folder: str, out: str, records_per_shard: int) -> dict:
    index = write_shards(list_image_folder(folder), out, records_per_shard, log=logs.log)
    counts = ", ".join(f"{s} {v['records']} records in {len(v['shards'])} shards"
                       for s, v in index["splits"].items())
    logs.log(f"[shards] {out}: {len(index['classes'])} classes; {counts}")
    return index


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    logs.exit_on_error(convert, FLAGS.folder, FLAGS.out, FLAGS.records_per_shard,
                       errors=(FileExistsError,))


def run(argv=None):
    define_flags()
    cli.run_app(main, argv)


if __name__ == "__main__":
    run()
