"""Policy texts several lab test modules run nfqfw with."""

from __future__ import annotations

# Ingress: only SMTP to the inside host (rule mail); egress: everything but SMB, which is refused.
MAIL_IN_NO_SMB_OUT = """\
zones:
  external: [wan0]
  internal: [lan0]
ingress:
  - name: mail
    proto: tcp
    to: [10.0.0.25, fd00::25]
    ports: [25]
    action: accept
egress:
  - name: no-smb-out
    proto: tcp
    ports: [445]
    action: reject
"""
