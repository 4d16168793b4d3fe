"""Parses Prometheus text from stdin with prometheus_client's parser and prints the samples as
JSON: {"name{label=value,...}": value}. Exits non-zero if the text does not parse."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "node")
        samples[f"{sample.name}{{{labels}}}"] = sample.value
print(json.dumps(samples, sort_keys=True))
