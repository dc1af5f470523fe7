"""Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before any test
module imports triton (through train_gpt)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ENVIRONMENT_BEFORE_IMPORT = dict(os.environ)  # before any test module imports train_gpt


@pytest.fixture
def environment_before_import():
    """The environment as it was before train_gpt was imported: a probe started with it sees what
    importing the script does to it (this process has imported it already)."""
    return dict(ENVIRONMENT_BEFORE_IMPORT)


def replaced(args, *flags_and_values):
    """args with these flags' values replaced, or added where absent: a flag may be given only once."""
    args = list(args)
    for flag, value in zip(flags_and_values[::2], flags_and_values[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args
