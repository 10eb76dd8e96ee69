"""refold.sagas: the saga API users write against (a stable surface, like `refold`).

```python
from refold.sagas import Saga, Step, Send
```

See `refold.core.sagas` for the rules a saga follows and `refold.core.saga_decision` for its
pure decision, `advance`.
"""

from refold.core.saga_decision import advance
from refold.core.sagas import Saga, Send, Step

__all__ = ["Saga", "Send", "Step", "advance"]
