# Stub of the extension fastsgd._native.plan (a group's staging and the plan cache).
NO_AUTOGRAD: str

def parallel_staging_count() -> int: ...

class GroupPlan:
    new_buffers: list[tuple[int, object]]
