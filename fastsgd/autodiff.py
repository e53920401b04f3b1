"""fastsgd.Parameter made differentiable by HIPS autograd, which fastsgd never imports.

autograd finds how to trace and differentiate a value by its exact type, in
two tables that ``autograd.numpy`` fills for ``np.ndarray``: a Parameter
needs the same entries.  They are added once autograd's numpy layer exists:
at ``import fastsgd`` if it is already imported, else right after the program
imports it (a one-shot import hook, which only ever acts on the name
``autograd.numpy``).  :func:`register_autograd` adds them by hand.
"""
import importlib.abc
import importlib.util
import sys

import numpy as np

from .parameter import Parameter

_AUTOGRAD_NUMPY = "autograd.numpy"


def register_autograd():
    """Let HIPS autograd differentiate with respect to Parameters.

    Registers :class:`fastsgd.Parameter` with autograd's ``ArrayBox`` and
    ``ArrayVSpace`` (the ones of ``np.ndarray``), so ``autograd.grad`` traces
    a Parameter as the array it is and returns its gradient as a plain
    ndarray of the parameter's shape.  fastsgd calls it itself when
    ``autograd.numpy`` is imported (before or after fastsgd); calling it
    again does nothing new.  Imports ``autograd.numpy``.

    Example::

        import autograd.numpy as anp
        import numpy as np
        from autograd import grad
        import fastsgd

        w = fastsgd.Parameter(np.ones(3))
        w.grad = grad(lambda w: anp.sum(w ** 2))(w)   # [2., 2., 2.]
    """
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox

    ArrayBox.register(Parameter)
    VSpace.register(Parameter, VSpace.mappings[np.ndarray])


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the import of autograd.numpy it leaves
    sys.meta_path and hands the import to the other finders, with a loader
    that registers Parameter once the module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _AUTOGRAD_NUMPY or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """A module's loader that calls register_autograd() after running it,
    then gives the module back its own loader."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        register_autograd()

    def __getattr__(self, name):  # the wrapped loader's resources, code, ...
        return getattr(self._loader, name)


def _register_when_imported():
    """Register now if autograd.numpy is imported, else once it is."""
    if _AUTOGRAD_NUMPY in sys.modules:
        register_autograd()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
