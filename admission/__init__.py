"""Admission: the controller that lets fans out of the line, and the queue passes it signs.

- :mod:`admission.passes`: Ed25519 queue passes, the JWKS, and the gate checkout calls
  (:func:`admission.passes.require_pass`);
- :mod:`admission.bucket`: the pure token bucket and admission decision;
- :mod:`admission.leader`: the per-event Redis lease (one admission loop across processes);
- :mod:`admission.loop`: the admission loop and the per-process :class:`AdmissionService`;
- :mod:`admission.operators`: what operators change (rate, cap, pause, revocation), shared
  by the admin API (:mod:`waitroom.admission_api`) and the CLI.
"""
