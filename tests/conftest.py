import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)


def pytest_terminal_summary(terminalreporter):
    """The jail's layers on this machine, at the end of the run (where CI's output is read)."""
    import sandbox
    found = sandbox.isolation()
    terminalreporter.write_line(f"sandbox layers: {'; '.join(sorted(found['layers'].values()))}"
                                f" | missing: {'; '.join(found['missing']) or 'none'}")
