import os
import signal

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# A run started in the background by a non-interactive shell (`nohup pytest ... &`) inherits
# SIGINT ignored: Python then installs no KeyboardInterrupt handler, nor do the processes the
# tests start (an ignored signal stays ignored across exec). The interrupt tests need the usual one.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
