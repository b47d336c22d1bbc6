"""`python -m runtime.tensorrt EXPORT_DIR`: build TensorRT engines on this device."""

import sys

from .build import main

sys.exit(main())
