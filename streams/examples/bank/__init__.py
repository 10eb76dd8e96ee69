"""The bank passbook, refold's guiding example app: `REFOLD_APP=refold.examples.bank`.

Balances are folds of deposits and withdrawals, never stored as truth. The app holds the
`accounts` decider (commands with invariants: no overdraft), the `balances`, `passbook` and
`owners` projections, the `statements` task queue (monthly statements from the passbook,
merged by account) and the `transfers` saga; its Avro schemas ship with refold
(`refold.schemas`, folder `bank/`). It uses only the public API, like any user's app.
"""

from importlib import resources

from refold.examples.bank.accounts import Accounts
from refold.examples.bank.projections import ACCOUNTS, Balances, Owners, Passbook
from refold.examples.bank.statements import Statements
from refold.examples.bank.transfers import Transfers

__all__ = ["ACCOUNTS", "Accounts", "Balances", "Owners", "Passbook", "Statements", "Transfers"]

#: The bank's Avro schemas, shipped as package data (the repo's schemas/bank/).
SCHEMAS_DIRS = (resources.files("refold.schemas") / "bank",)
