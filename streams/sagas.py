"""refold.sagas: the saga API users write against (a stable surface, like `refold`).

```python
from refold.sagas import Saga, Step, Send
```

See `refold.core.sagas` for the rules a saga follows and its pure decision, `advance`.
"""

from refold.core.sagas import Saga, Send, Step, advance

__all__ = ["Saga", "Send", "Step", "advance"]
