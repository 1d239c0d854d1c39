"""Training patched models: data packing, objectives (distill / mlm / clm), the accelerate loop.

`surgeon.train(diff_dir, data_files, out_dir=..., objective=...)` trains; see `loop.train`.

`surgeon.train` is both this package and the function: importing any submodule binds the
package as the attribute `surgeon.train` (Python's import system), which would hide a function
of the same name. So the package itself is callable and forwards to `loop.train`.
"""

import inspect
import sys
import types

from .loop import TrainingInterrupted, TrainResult, train


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
__signature__ = inspect.signature(train)

__all__ = ["TrainResult", "TrainingInterrupted", "train"]
