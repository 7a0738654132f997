"""The sans-IO core: decoding, conntrack, policy and the engine that joins them.

Everything here is pure: bytes + metadata + a clock in, a verdict out.  Modules in this
package import only the standard library, each other and (config only) PyYAML; never
the adapters (queue, rules, links, daemon, lab) -- tests/unit/test_layering.py checks it.
"""
