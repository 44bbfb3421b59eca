'use strict';
// A small Node.js client of vmattach, built from the contract in protos/
// alone (no generated code): the Controller, Servers and Node services with
// promise-returning methods, and the decoding of vmattach's errors
// (google.rpc.Status with a google.rpc.ErrorInfo detail in the
// grpc-status-details-bin trailer).

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// protos/ of this repository; VMATTACH_PROTOS points elsewhere (a copy).
const PROTOS = process.env.VMATTACH_PROTOS || path.resolve(__dirname, '..', '..', 'protos');
const CONTRACT = ['vmattach/v1/controller.proto', 'vmattach/v1/servers.proto', 'vmattach/v1/node.proto'];
const DEFAULT_ADDRESS = '127.0.0.1:50051';

// Field names as in the .proto, enums by name ("VOLUME_STATUS_AVAILABLE"),
// int64 as strings (JavaScript numbers lose precision past 2^53), unset
// fields present with their default.
const LOADER_OPTIONS = { keepCase: true, enums: String, longs: String, defaults: true, oneofs: true };

function loadContract(protosDir = PROTOS) {
  const definition = protoLoader.loadSync(CONTRACT, { ...LOADER_OPTIONS, includeDirs: [protosDir] });
  return grpc.loadPackageDefinition(definition).vmattach.v1;
}

// google.rpc.Status and its detail types, from the copies shipped in protos/google/rpc.
function loadErrorTypes(protosDir = PROTOS) {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => (path.isAbsolute(target) ? target : path.join(protosDir, target));
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return root;
}

let errorTypes;

// The google.rpc.Status of a failed call, its details decoded:
// { code, message, details: [{ '@type': 'google.rpc.ErrorInfo', reason, domain, metadata }, ...] },
// or null when the call carries none (e.g. the server could not be reached).
function decodeStatus(err) {
  const raw = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw || raw.length === 0) return null;
  errorTypes = errorTypes || loadErrorTypes();
  const Status = errorTypes.lookupType('google.rpc.Status');
  const status = Status.decode(raw[0]);
  const details = status.details.map((any) => {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    let type;
    try {
      type = errorTypes.lookupType(name);
    } catch (_) {
      return { '@type': name };
    }
    const object = type.toObject(type.decode(any.value), { longs: String, enums: String, defaults: true });
    return { '@type': name, ...object };
  });
  return { code: status.code, message: status.message, details };
}

// The ErrorInfo of a failed call ({ reason, domain, metadata }), or null.
function errorInfo(err) {
  const status = decodeStatus(err);
  if (!status) return null;
  const info = status.details.find((d) => d['@type'] === 'google.rpc.ErrorInfo');
  if (!info) return null;
  return { reason: info.reason, domain: info.domain, metadata: info.metadata || {} };
}

function promisify(stub, timeoutSeconds, token) {
  const wrapped = {};
  for (const name of Object.keys(Object.getPrototypeOf(stub))) {
    if (typeof stub[name] !== 'function' || !stub[name].path) continue;
    wrapped[name] = (request = {}, options = {}) =>
      new Promise((resolve, reject) => {
        const deadline = new Date(Date.now() + 1000 * (options.timeout || timeoutSeconds));
        const metadata = new grpc.Metadata();
        if (token) metadata.set('authorization', `Bearer ${token}`);
        stub[name](request, metadata, { deadline }, (err, response) => {
          if (err) reject(err);
          else resolve(response);
        });
      });
  }
  return wrapped;
}

// TLS from the files `vmattach pki init` writes (VMATTACH_TLS_CA, and for
// mutual TLS VMATTACH_TLS_CERT and VMATTACH_TLS_KEY), else plain text.
function credentialsFromEnv(env = process.env) {
  if (!env.VMATTACH_TLS_CA) return grpc.credentials.createInsecure();
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  return grpc.credentials.createSsl(read('VMATTACH_TLS_CA'), read('VMATTACH_TLS_KEY'), read('VMATTACH_TLS_CERT'));
}

// Clients of the three services at one address (a `vmattach serve` with
// every service), or the Controller at its own address (controllerAddress).
// options.token (default $VMATTACH_TOKEN): a user token of `vmattach token create`.
function connect(address = process.env.VMATTACH_ADDRESS || DEFAULT_ADDRESS, options = {}) {
  const v1 = loadContract(options.protos);
  const credentials = options.credentials || credentialsFromEnv();
  const timeout = options.timeout || 120;
  const token = options.token === undefined ? process.env.VMATTACH_TOKEN : options.token;
  const stubs = {
    servers: new v1.Servers(address, credentials),
    controller: new v1.Controller(options.controllerAddress || address, credentials),
    node: new v1.Node(address, credentials),
  };
  return {
    address,
    servers: promisify(stubs.servers, timeout, token),
    controller: promisify(stubs.controller, timeout, token),
    node: promisify(stubs.node, timeout, token),
    close() {
      for (const stub of Object.values(stubs)) stub.close();
    },
  };
}

module.exports = { connect, decodeStatus, errorInfo, loadContract, PROTOS, grpc };
