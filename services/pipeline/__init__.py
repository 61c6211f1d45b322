"""The whole pipeline on one machine: `stack` starts a broker, the topics and every declared
process under a supervisor (what `orderpipe up` and `demo`, the e2e tests and the bench run);
`demo` places sample orders and checks every outcome. Above the registry, below the CLI."""
