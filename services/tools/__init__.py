"""Tools around the pipeline, outside the core runtime that every process runs on.

- `brokers/`: local Kafka-protocol brokers (embedded Tansu, Apache Kafka from Maven Central) for
  `orderpipe up`, the demo, the tests and the bench, and what Tansu needs beyond the protocol;
- `supervisor.py`: starts, restarts and stops the processes of `orderpipe up`;
- `compatibility.py`: the schema compatibility check behind `orderpipe schemas check`.

The runtime and the services never import them (tests/unit/test_import_rules.py).
"""
