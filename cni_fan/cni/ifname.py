"""The one rule for an interface name: CNI_IFNAME, and the config's `bridge` and `underlayInterface`.

The CNI library's rule (libcni's `ValidateInterfaceName`, what runtimes
check before they call us): 1 to 15 bytes, not "." or "..", and no "/",
":" or white space. Anything else is a name the kernel takes, '@' and
non-ASCII letters included. Three refinements so that a name we accept is
one we can create under that name and report:

- the kernel tests each byte with its own `isspace`, which also counts the
  byte 0xA0, found inside UTF-8 encodings such as "à": refused;
- a name with '%' is a template to the kernel ("eth%d" becomes "eth0", any
  other '%' is EINVAL): refused;
- the name must be UTF-8 without NUL: the kernel's names are C strings and
  the CNI result carries the name as a JSON string.

Pure, standard library only.
"""
from __future__ import annotations

import re

IFNAMSIZ = 16  # the kernel's buffer, with its terminating NUL: 15 bytes of name
MAX_IFNAME_BYTES = IFNAMSIZ - 1
# Unicode's White_Space characters (Go's unicode.IsSpace, which libcni uses); NUL; '%'.
_WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_FORBIDDEN_CHARS = re.compile(f"[/:%\x00{_WHITE_SPACE}]")
_KERNEL_SPACE_BYTES = frozenset(b"\t\n\v\f\r \xa0")
IFNAME_FORM = "an interface name of 1 to 15 bytes without '/', ':', '%' or white space, not '.' or '..'"


def is_ifname(name: str) -> bool:
    """True when `name` is an interface name CNI passes and the kernel creates."""
    if name in ("", ".", "..") or _FORBIDDEN_CHARS.search(name):
        return False
    try:
        encoded = name.encode("utf-8")  # a lone surrogate (undecodable bytes from the environment) fails here
    except UnicodeEncodeError:
        return False
    return len(encoded) <= MAX_IFNAME_BYTES and not _KERNEL_SPACE_BYTES.intersection(encoded)
