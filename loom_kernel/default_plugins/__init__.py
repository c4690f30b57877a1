"""Plugins that ship with the kernel and run last, so any installed plugin can override them."""
