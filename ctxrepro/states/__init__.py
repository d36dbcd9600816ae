"""Kept resume states (issue 22): `folders` keeps one state per configuration of the keys that change the
maths, so a changed param never overwrites a resume state; `listing` lists them and removes one only when
asked (`ctxrepro states`). The checks every state passes before it is trusted are in `ctxrepro.checkpoint`."""
