"""NATS JetStream shared by the ``nats`` sink and ``edge relay``: subjects and partitions
(``subjects``), connection settings and auth (``config``), connecting (``connection``)."""
