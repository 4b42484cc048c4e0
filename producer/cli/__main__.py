"""``python -m producer.cli``: the ``inferq`` command, as workers start their device processes and tests run it."""

from producer.cli import main

main()
