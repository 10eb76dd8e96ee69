"""refold.tasks: the task API users write against (a stable surface, like `refold`).

```python
from refold.tasks import TaskQueue, Task, Retry
```

See `refold.core.tasks` for the queue's settings and the handler idempotency contract.
"""

from refold.core.tasks import Retry, Task, TaskQueue

__all__ = ["Retry", "Task", "TaskQueue"]
