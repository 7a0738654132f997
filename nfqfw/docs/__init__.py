"""What is generated from the code for the operator: the man pages nfqfw(8) (from the argparse
definitions of nfqfw.cli) and nfqfw-policy(5) (the policy grammar: nfqfw.docs.policy, checked
against nfqfw.core.config's keys), and the bash completion. `python -m nfqfw.docs OUTDIR`
writes nfqfw.8, nfqfw-policy.5 and nfqfw.bash-completion; `make install` and `make deb` run it,
so a new command or option appears in all three by itself.
"""
