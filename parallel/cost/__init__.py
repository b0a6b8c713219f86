"""The cost model: a training step projected onto hardware, with nothing executed.

The layer above the runtime (`parallel/`), which never imports it: hardware profiles
(`hardware`), the projection of a step (`projection`) from its GEMMs (`flops`), collectives
(`collectives`), memory (`memory`) and the replayed pipeline schedule (`replay`), calibration
against measurements (`calibration`) and the layout tuner (`tuning`).
"""
