"""Validates an OpenAPI document with openapi-spec-validator (the reference validator).

Usage: python scripts/validate_openapi.py FILE  -> prints "valid: <version>" or fails.
"""
import json
import sys

from openapi_spec_validator import validate

doc = json.load(open(sys.argv[1]))
validate(doc)
print(f"valid: OpenAPI {doc['openapi']}, {len(doc['paths'])} paths")
