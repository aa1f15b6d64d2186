"""Options shared by the trainer tests. A module with a name of its own: ``from conftest import``
would find whichever ``conftest`` module pytest imported last."""

# options that keep a run to about a second on a busy 2-core machine
SMALL = ["--train-limit", "128", "--width", "4", "--batch-size", "32", "--threads", "1",
         "--no-progress"]
