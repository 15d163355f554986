"""quorumblk: a voting block device over N replica images."""
from .core import Quorum, vote
from .errors import (DegradedError, InvalidArgumentError, NoQuorumError,
                     QuorumError)

__all__ = ["Quorum", "vote", "QuorumError", "NoQuorumError", "DegradedError",
           "InvalidArgumentError"]
__version__ = "0.1.0"
