"""The core: plain types and pure functions every layer may import (outcomes, errors, presence, schemas, settings)."""
