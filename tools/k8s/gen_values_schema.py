#!/usr/bin/env python3
"""Writes helm/fhirmesh/values.schema.json: the JSON Schema (draft-07) of the chart's values.

    fhirmesh config > /tmp/config.json      # a binary of this tree prints every key with its default
    tools/k8s/gen_values_schema.py /tmp/config.json

`config` in the values mirrors the binary's configuration: one section per section, one property
per key, typed from the default (null → string or null), enums below, unknown keys refused — as the
binary refuses them. The rest (services, probes, …) is described here by hand. Run it again when
the binary gains or loses a key; `FHIRMESH_BIN=… make k8s-validate` says when it is due.
"""
import json
import sys
from pathlib import Path

cfg = json.load(open(sys.argv[1]))

enums = {
    ('storage', 'backend'): ['sqlite', 'dynamodb'],
    ('search', 'backend'): ['sqlite', 'opensearch'],
    ('bus', 'backend'): ['in_process', 'nats', 'sns_sqs'],
    ('blob', 'backend'): ['local', 's3'],
    ('relay', 'source'): ['change_log', 'streams'],
    ('auth', 'mode'): ['none', 'jwt'],
    ('auth', 'authorization'): ['rbac', 'smart'],
    ('log', 'format'): ['text', 'json'],
}
signed = {('nats', 'max_deliver')}

def key_schema(section, key, default):
    e = enums.get((section, key))
    if e:
        return {'type': 'string', 'enum': e}
    if default is None:
        return {'type': ['string', 'null']}
    if isinstance(default, bool):
        return {'type': 'boolean'}
    if isinstance(default, int):
        s = {'type': 'integer'}
        if (section, key) not in signed:
            s['minimum'] = 0
        return s
    if isinstance(default, str):
        return {'type': 'string'}
    if isinstance(default, list):
        return {'type': 'array', 'items': {'type': 'string'}}
    raise SystemExit(f'no schema for {section}.{key}: {default!r}')

config_props = {}
for section in sorted(cfg):
    props = {k: key_schema(section, k, v) for k, v in sorted(cfg[section].items())}
    config_props[section] = {'type': ['object', 'null'], 'additionalProperties': False, 'properties': props}

str_map = {'type': 'object', 'additionalProperties': {'type': 'string'}}
obj = {'type': 'object'}
env_list = {'type': 'array', 'items': {
    'type': 'object', 'required': ['name'],
    'properties': {'name': {'type': 'string', 'minLength': 1}, 'value': {'type': 'string'}, 'valueFrom': obj},
    'additionalProperties': False}}
quantity = {'type': ['string', 'number']}
resources = {'type': 'object', 'additionalProperties': False, 'properties': {
    'requests': {'type': 'object', 'additionalProperties': quantity},
    'limits': {'type': 'object', 'additionalProperties': quantity}}}
int_or_str = {'type': ['integer', 'string']}
service_type = {'type': 'object', 'additionalProperties': False, 'properties': {
    'type': {'type': 'string', 'enum': ['ClusterIP', 'NodePort', 'LoadBalancer']},
    'annotations': str_map}}

def service_block(with_service):
    props = {
        'enabled': {'type': 'boolean'},
        'replicas': {'type': 'integer', 'minimum': 0},
        'resources': resources,
        'autoscaling': {'type': 'object', 'additionalProperties': False,
                        'required': ['enabled', 'minReplicas', 'maxReplicas', 'targetCPUUtilizationPercentage'],
                        'properties': {
                            'enabled': {'type': 'boolean'},
                            'minReplicas': {'type': 'integer', 'minimum': 1},
                            'maxReplicas': {'type': 'integer', 'minimum': 1},
                            'targetCPUUtilizationPercentage': {'type': 'integer', 'minimum': 1, 'maximum': 100}}},
        'keda': {'type': 'object', 'additionalProperties': False,
                 'required': ['enabled', 'minReplicas', 'maxReplicas', 'pollingInterval', 'cooldownPeriod', 'triggers'],
                 'properties': {
                     'enabled': {'type': 'boolean'},
                     'minReplicas': {'type': 'integer', 'minimum': 0},
                     'maxReplicas': {'type': 'integer', 'minimum': 1},
                     'pollingInterval': {'type': 'integer', 'minimum': 1},
                     'cooldownPeriod': {'type': 'integer', 'minimum': 0},
                     'triggers': {'type': 'array', 'items': {
                         'type': 'object', 'required': ['type'],
                         'properties': {'type': {'type': 'string'}, 'name': {'type': 'string'},
                                        'metadata': str_map, 'metricType': {'type': 'string'},
                                        'authenticationRef': obj, 'useCachedMetrics': {'type': 'boolean'}},
                         'additionalProperties': False}}}},
        'pdb': {'type': 'object', 'additionalProperties': False, 'required': ['enabled'], 'properties': {
            'enabled': {'type': 'boolean'}, 'maxUnavailable': int_or_str, 'minAvailable': int_or_str}},
        'nodeSelector': str_map,
        'tolerations': {'type': 'array', 'items': obj},
        'affinity': obj,
        'topologySpreadConstraints': {'type': 'array', 'items': obj},
        'extraEnv': env_list,
        'podAnnotations': str_map,
        'serviceAccountAnnotations': str_map,
    }
    if with_service:
        props['service'] = service_type
    return {'type': 'object', 'additionalProperties': False,
            'required': ['enabled', 'replicas', 'resources', 'autoscaling', 'keda', 'pdb'],
            'properties': props}

probe = {'type': 'object', 'additionalProperties': False, 'properties': {
    'initialDelaySeconds': {'type': 'integer', 'minimum': 0},
    'periodSeconds': {'type': 'integer', 'minimum': 1},
    'timeoutSeconds': {'type': 'integer', 'minimum': 1},
    'failureThreshold': {'type': 'integer', 'minimum': 1},
    'successThreshold': {'type': 'integer', 'minimum': 1}}}
port = {'type': 'integer', 'minimum': 1, 'maximum': 65535}
peers = {'type': 'array', 'items': obj}

schema = {
    '$schema': 'http://json-schema.org/draft-07/schema#',
    'title': 'fhirmesh Helm values',
    'description': 'Every key of values.yaml. config mirrors the binary\'s configuration (`fhirmesh config` prints it): a key the binary does not know is refused here too, so a new binary key needs adding to config.properties.',
    'type': 'object',
    'additionalProperties': False,
    'required': ['profile', 'image', 'config', 'ports', 'gateway', 'resource', 'relay', 'indexer', 'notifier', 'exporter', 'binary'],
    'definitions': {'service': service_block(False), 'gatewayService': service_block(True)},
    'properties': {
        'global': obj,
        'profile': {'type': 'string', 'enum': ['aws', 'in-cluster', 'embedded']},
        'nameOverride': {'type': 'string'},
        'fullnameOverride': {'type': 'string'},
        'image': {'type': 'object', 'additionalProperties': False, 'required': ['repository'], 'properties': {
            'repository': {'type': 'string', 'minLength': 1}, 'tag': {'type': 'string'},
            'pullPolicy': {'type': 'string', 'enum': ['Always', 'IfNotPresent', 'Never']}}},
        'imagePullSecrets': {'type': 'array', 'items': {'type': 'object', 'required': ['name'],
                                                        'properties': {'name': {'type': 'string'}}}},
        'config': {'type': 'object', 'additionalProperties': False, 'properties': config_props},
        'ports': {'type': 'object', 'additionalProperties': False,
                  'required': ['http', 'ops', 'resourceGrpc', 'exporterGrpc', 'binaryGrpc'],
                  'properties': {k: port for k in ['http', 'ops', 'resourceGrpc', 'exporterGrpc', 'binaryGrpc']}},
        'extraEnv': env_list,
        'extraEnvFrom': {'type': 'array', 'items': obj},
        'secret': {'type': 'object', 'additionalProperties': False, 'properties': {
            'create': {'type': 'boolean'},
            'data': {'type': 'object', 'additionalProperties': {'type': ['string', 'number', 'boolean']}}}},
        'existingSecret': {'type': 'string'},
        'serviceAccount': {'type': 'object', 'additionalProperties': False, 'properties': {
            'create': {'type': 'boolean'}, 'perService': {'type': 'boolean'}, 'name': {'type': 'string'},
            'annotations': str_map}},
        'podSecurityContext': obj,
        'securityContext': obj,
        'podAnnotations': str_map,
        'podLabels': str_map,
        'probes': {'type': 'object', 'additionalProperties': False, 'required': ['liveness', 'readiness', 'startup'],
                   'properties': {'liveness': probe, 'readiness': probe, 'startup': probe}},
        'terminationGracePeriodSeconds': {'type': ['integer', 'null'], 'minimum': 1},
        'grpcTls': {'type': 'object', 'additionalProperties': False, 'properties': {
            'enabled': {'type': 'boolean'}, 'secretName': {'type': 'string'}, 'clientAuth': {'type': 'boolean'}}},
        'networkPolicy': {'type': 'object', 'additionalProperties': False, 'properties': {
            'enabled': {'type': 'boolean'}, 'gatewayFrom': peers, 'metricsFrom': peers}},
        'serviceMonitor': {'type': 'object', 'additionalProperties': False, 'properties': {
            'enabled': {'type': 'boolean'}, 'interval': {'type': 'string'}, 'scrapeTimeout': {'type': 'string'},
            'labels': str_map}},
        'ingress': {'type': 'object', 'additionalProperties': False, 'properties': {
            'enabled': {'type': 'boolean'}, 'className': {'type': 'string'}, 'annotations': str_map,
            'hosts': {'type': 'array', 'items': {'type': 'object', 'additionalProperties': False, 'required': ['host', 'paths'],
                      'properties': {'host': {'type': 'string'}, 'paths': {'type': 'array', 'items': {
                          'type': 'object', 'additionalProperties': False, 'required': ['path'],
                          'properties': {'path': {'type': 'string'},
                                         'pathType': {'type': 'string', 'enum': ['Prefix', 'Exact', 'ImplementationSpecific']}}}}}}},
            'tls': {'type': 'array', 'items': obj}}},
        'provision': {'type': 'object', 'additionalProperties': False, 'properties': {
            'enabled': {'type': 'boolean'}, 'serviceAccountAnnotations': str_map,
            'backoffLimit': {'type': 'integer', 'minimum': 0},
            'activeDeadlineSeconds': {'type': 'integer', 'minimum': 1}, 'resources': resources}},
        'persistence': {'type': 'object', 'additionalProperties': False, 'properties': {
            'enabled': {'type': 'boolean'}, 'existingClaim': {'type': 'string'}, 'storageClass': {'type': 'string'},
            'accessModes': {'type': 'array', 'items': {'type': 'string', 'enum': ['ReadWriteOnce', 'ReadWriteOncePod', 'ReadWriteMany']}},
            'size': {'type': 'string'}}},
        'tests': {'type': 'object', 'additionalProperties': False, 'properties': {
            'image': {'type': 'string'}, 'tenant': {'type': 'string'}}},
        'gateway': {'$ref': '#/definitions/gatewayService'},
        'resource': {'$ref': '#/definitions/service'},
        'relay': {'$ref': '#/definitions/service'},
        'indexer': {'$ref': '#/definitions/service'},
        'notifier': {'$ref': '#/definitions/service'},
        'exporter': {'$ref': '#/definitions/service'},
        'binary': {'$ref': '#/definitions/service'},
        'embedded': {'type': 'object', 'additionalProperties': False, 'properties': {
            'service': service_type, 'resources': resources, 'nodeSelector': str_map,
            'tolerations': {'type': 'array', 'items': obj}, 'affinity': obj, 'extraEnv': env_list,
            'podAnnotations': str_map, 'serviceAccountAnnotations': str_map}},
    },
}
out = Path(__file__).resolve().parents[2] / 'helm' / 'fhirmesh' / 'values.schema.json'
out.write_text(json.dumps(schema, indent=2) + '\n')
print(f'wrote {out}')
