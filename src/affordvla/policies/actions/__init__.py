"""Action policies: continuous heads reading learnable action tokens (continuous.py) and heads that write the
action as text (language.py), on a shared base (base.py); `load` rebuilds an export as an `ActionPolicy`
(inference.py) for `load_policy`."""

from affordvla.policies.actions.base import ActionPolicyModuleBase
from affordvla.policies.actions.continuous import FORMULATIONS, ContinuousActionModule
from affordvla.policies.actions.inference import EXECUTIONS, ActionPolicy, ActionSession, ActionStep
from affordvla.policies.actions.language import LanguageActionModule
from affordvla.policies.actions.loading import load

__all__ = ["EXECUTIONS", "FORMULATIONS", "ActionPolicy", "ActionPolicyModuleBase", "ActionSession", "ActionStep",
           "ContinuousActionModule", "LanguageActionModule", "load"]
