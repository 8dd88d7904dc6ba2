"""Edge quality workflows: lot state, hold and release episodes, supplier cases, CAPA.

- ``edge.quality.rules``   config models (``spec_limits``, ``capa``, the ``quality:``
                           section); ``edge.rules`` re-exports them for ``edge.config``
- ``edge.quality.state``   lot rows, CAPA counts, the changes to them and the committed
                           cache (pure: shared by the rules and the outbox writer)
- ``edge.quality.engine``  what the pipeline calls: derive, release, catch up
- ``edge.quality.monitor`` stuck lots, delivery SLAs, failed supplier notifications:
                           gauges and the ``/status`` sections
- ``edge.quality.reconcile`` reads lot statuses back from the ERP / QMS: mismatches, and
                           decisions that flow down as local ``lot.status`` events

The tables live in the outbox (``edge.outbox.lots``). Operator docs: ``docs/quality.md``.
Importing this package imports nothing else (``edge.config`` reaches it early).
"""
