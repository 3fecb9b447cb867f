"""A stand-in for a GPU on a machine without one: `COURSE_DEVICE=sim`.

Every lesson is executed and tested on CPUs, but a learner with a GPU runs the same cells with
`DEVICE = runtime.device()` on CUDA. The mistakes that only show there are tensors left behind on
the host: noise drawn on the CPU meeting a model on the GPU, a tensor handed to numpy or matplotlib
without `.cpu()`, a CPU generator asked to draw on the GPU. On a CPU they pass silently, because
everything is on one device. This module makes them fail here, the way CUDA fails:

- `SIM = torch.device("cpu", 0)` is the simulated device. A tensor on it is a `SimTensor` (a
  torch.Tensor subclass in ordinary CPU memory whose `.device` reads `cpu:0`); a tensor on
  `torch.device("cpu")` is a host tensor, as before. Models moved with `.to(SIM)` hold SimTensors.
- One TorchFunctionMode sees every torch call and enforces CUDA's rules: an op mixing a SimTensor
  with a host tensor of one or more dimensions is an error (0-dim host tensors are scalars, as on
  CUDA); so is `.numpy()` / `np.asarray` of a SimTensor, and a factory call with `device=SIM` and
  a CPU `generator=`. Host tensors may index a SimTensor and `copy_` crosses devices, as on CUDA.
- Results of an op on SimTensors are SimTensors; `.cpu()` and `.to("cpu")` give host tensors;
  `.to(SIM)`, `device=SIM` and `x.device` propagate the device as CUDA's would.

It checks placement only: numbers are the CPU's, bit for bit. `enable()` turns it on for the
rest of the process (runtime.device() calls it for COURSE_DEVICE=sim); tests/test_simdevice.py
shows each rule. Known gap: a `torch.Generator(device=SIM)` is a CPU generator here (its device
reads "cpu"), so drawing on SIM with it is refused although CUDA would accept a CUDA generator;
the course draws with CPU generators and moves the noise, which is the same on every device.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

SIM = torch.device("cpu", 0)
HOST = torch.device("cpu")
_MSG = "simulated GPU (COURSE_DEVICE=sim): "


class SimDeviceError(RuntimeError):
    """What CUDA would raise: tensors on two devices in one op, or device memory read as numpy."""


class SimTensor(torch.Tensor):
    """A tensor on the simulated device (CPU memory; every op is checked by the mode)."""
    __torch_function__ = torch._C._disabled_torch_function_impl


def _is_sim_device(d) -> bool:
    if d is None or isinstance(d, torch.dtype):
        return False
    if isinstance(d, int):         # .to(0) / device=0 means cuda:0 on CUDA machines; here the simulated GPU
        return not isinstance(d, bool)
    try:
        d = torch.device(d)
    except (RuntimeError, TypeError):
        return False
    return d.type == "cpu" and d.index is not None


def _as_device(d):
    """A device argument, unchanged unless it names the simulated GPU: then the plain CPU."""
    return "cpu" if _is_sim_device(d) else d


def _wrap(out):
    if isinstance(out, SimTensor):
        return out
    if isinstance(out, torch.Tensor):
        return out.as_subclass(SimTensor) if type(out) is torch.Tensor else out
    if isinstance(out, (list, tuple)):
        items = [_wrap(o) for o in out]
        try:
            return type(out)(items)
        except TypeError:
            return type(out)(*items)   # namedtuples
    return out


def _unwrap(out):
    if isinstance(out, SimTensor):
        return out.as_subclass(torch.Tensor)
    if isinstance(out, (list, tuple)):
        items = [_unwrap(o) for o in out]
        try:
            return type(out)(items)
        except TypeError:
            return type(out)(*items)
    return out


def _tensors(obj, found, depth=0):
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, found, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, found, depth + 1)
    return found


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _mixed(func, sims, hosts):
    h = hosts[0]
    raise SimDeviceError(
        f"{_MSG}{_name(func)} got tensors on two devices: the GPU and the host (a {tuple(h.shape)} "
        f"{str(h.dtype).replace('torch.', '')} tensor on the CPU). On CUDA this is 'Expected all tensors "
        "to be on the same device'. Move it with .to(DEVICE), or create it with device=DEVICE.")


def _getter(name):
    prop = torch.Tensor.__dict__.get(name) or getattr(torch._C.TensorBase, name, None)
    return getattr(prop, "__get__", None)


_DEVICE_GET = _getter("device")
_PASS_THROUGH = {_getter(n) for n in ("shape", "dtype", "requires_grad", "is_leaf", "ndim", "names",
                                      "layout", "is_sparse", "is_quantized", "is_meta", "grad_fn",
                                      "_version", "is_cuda", "itemsize", "nbytes", "output_nr")}
_PASS_THROUGH.discard(None)
_WRAP_GETTERS = {_getter(n) for n in ("grad", "data", "T", "mT", "H", "mH", "real", "imag")}
_WRAP_GETTERS.discard(None)
# calls that move data between devices or only look at tensors: never a mixing error
_CROSS_DEVICE = {torch.Tensor.copy_, torch._has_compatible_shallow_copy_type,
                 getattr(torch._C.TensorBase, "_is_view", None), torch.Tensor.is_set_to,
                 torch.Tensor.data_ptr, torch.Tensor.untyped_storage, torch.Tensor.size, torch.Tensor.dim,
                 torch.Tensor.numel, torch.Tensor.element_size, torch.Tensor.stride, torch.Tensor.is_contiguous,
                 torch.Tensor.__len__, torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__hash__,
                 torch.Tensor.storage_offset, torch.Tensor.get_device, torch.Tensor.register_hook,
                 torch.Tensor.requires_grad_, torch.Tensor.retain_grad}
_HOST_RESULT = {torch.Tensor.cpu, torch.from_numpy}
_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}
_SCALAR = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
           torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__complex__}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_SET_DATA = getattr(torch.Tensor.__dict__.get("data") or torch._C.TensorBase.data, "__set__", None)


def _move_target(args, kwargs):
    """What `.to(...)` moves to: 'sim', 'host', or None (dtype only)."""
    cands = [kwargs.get("device")] + list(args[1:])
    for c in cands:
        if c is None or isinstance(c, (torch.dtype, bool)):
            continue
        if isinstance(c, torch.Tensor):
            return "sim" if isinstance(c, SimTensor) else "host"
        if isinstance(c, (str, torch.device, int)):
            try:
                d = torch.device(c) if not isinstance(c, int) else None
            except (RuntimeError, TypeError):
                continue
            if d is None or _is_sim_device(d):
                return "sim"
            return "host" if d.type == "cpu" else d.type
    return None


class _SimMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return SIM if isinstance(args[0], SimTensor) else func(*args)
        if func in _PASS_THROUGH:
            return func(*args, **kwargs)
        if func in _WRAP_GETTERS:
            out = func(*args, **kwargs)
            return _wrap(out) if isinstance(args[0], SimTensor) else out
        if func == _SET_DATA:
            return func(*args, **kwargs)
        if func in _NUMPY:
            if isinstance(args[0], SimTensor):
                raise SimDeviceError(f"{_MSG}can't convert a GPU tensor to numpy (on CUDA: 'can't convert "
                                     "cuda:0 device type tensor to numpy'). Use .cpu() first, e.g. "
                                     "plt.imshow(x.cpu()).")
            return func(*args, **kwargs)
        if func in _SCALAR:
            return func(*args, **kwargs)
        if func is torch.Tensor.__format__ and isinstance(args[0], SimTensor):
            # torch formats a 0-dim tensor by its item only for exact torch.Tensor, as CUDA's tensors are
            return func(args[0].as_subclass(torch.Tensor), *args[1:], **kwargs)
        if func is torch.Tensor.__deepcopy__ and isinstance(args[0], SimTensor):
            src, memo = args[0], args[1]
            if id(src) not in memo:   # torch's own deepcopy of a subclass needs new_empty to keep the type
                out = src.as_subclass(torch.Tensor).detach().clone().as_subclass(SimTensor)
                out.requires_grad_(src.requires_grad)
                if getattr(src, "_is_param", False):
                    out._is_param = True
                memo[id(src)] = out
            return memo[id(src)]
        if func is torch.Tensor.to:
            target = _move_target(args, kwargs)
            new_args = tuple(_as_device(a) if not isinstance(a, torch.Tensor) else
                             (a.as_subclass(torch.Tensor) if isinstance(a, SimTensor) else a) for a in args[1:])
            new_kwargs = {k: (_as_device(v) if k == "device" else v) for k, v in kwargs.items()}
            out = func(args[0], *new_args, **new_kwargs)
            if target == "sim":
                if not isinstance(args[0], SimTensor) and out.data_ptr() == args[0].data_ptr() and out.numel():
                    out = out.clone()   # a move to the GPU is a copy
                return _wrap(out)
            if target == "host":
                return _unwrap(out)
            return _wrap(out) if isinstance(args[0], SimTensor) else out
        if func in _HOST_RESULT:
            return _unwrap(func(*args, **kwargs))
        if func in _CROSS_DEVICE:
            return func(*args, **kwargs)

        found = _tensors(args, []) + _tensors(kwargs, [])
        sims = [t for t in found if isinstance(t, SimTensor)]
        on_sim = bool(sims)
        if "device" in kwargs:
            dev = kwargs["device"]
            if _is_sim_device(dev):
                gen = kwargs.get("generator")
                if gen is not None and gen.device.type == "cpu":
                    raise SimDeviceError(f"{_MSG}{_name(func)} asked to draw on the GPU with a CPU generator "
                                         "(on CUDA: \"Expected a 'cuda' device type for generator but found "
                                         "'cpu'\"). Draw on the CPU and move the result: "
                                         "torch.randn(shape, generator=g).to(DEVICE).")
                kwargs = {**kwargs, "device": "cpu"}
                on_sim = True
            elif dev is not None:
                on_sim = False
        if sims:
            if func in _INDEXING:
                self_t = args[0]
                rest = _tensors(args[1:], []) + _tensors(kwargs, [])
                if isinstance(self_t, SimTensor):
                    # CPU index tensors may index a GPU tensor; a written value must be on the GPU (or 0-dim)
                    values = _tensors(args[2:], []) if func is torch.Tensor.__setitem__ else []
                    hosts = [t for t in values if not isinstance(t, SimTensor) and t.dim() > 0]
                else:
                    hosts = [self_t] if self_t.dim() > 0 else []
                    if not [t for t in rest if isinstance(t, SimTensor) and t.dim() > 0]:
                        hosts = []
                if hosts:
                    _mixed(func, sims, hosts)
            else:
                hosts = [t for t in found if not isinstance(t, SimTensor) and t.dim() > 0]
                if hosts:
                    _mixed(func, sims, hosts)
        out = func(*args, **kwargs)
        if on_sim:
            if func is torch.Tensor.__setitem__ or func in _INDEXING and not isinstance(args[0], SimTensor):
                return out
            return _wrap(out)
        return out


_mode = None


def enable() -> torch.device:
    """Turn the simulated GPU on for the rest of this process (idempotent) and return SIM."""
    global _mode
    if _mode is None:
        # Module.to(SIM) then replaces each Parameter by one holding a SimTensor (a copy), instead of
        # swapping .data under the old Parameter object; optimizers are built after the move
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        _mode = _SimMode()
        _mode.__enter__()
    return SIM


def disable() -> None:
    """Turn it off again (tests); SimTensors made meanwhile stay SimTensors but are no longer checked."""
    global _mode
    if _mode is not None:
        _mode.__exit__(None, None, None)
        _mode = None
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def enabled() -> bool:
    return _mode is not None


def is_sim(dev) -> bool:
    """True for the simulated GPU's device (cpu:0) while it is enabled."""
    return enabled() and _is_sim_device(dev)
