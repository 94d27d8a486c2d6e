"""The area hierarchy (DESIGN.md §7): city → district → street or township → community."""
