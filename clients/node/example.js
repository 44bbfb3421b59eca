'use strict';
// The example of the vmattach Node.js client: create a volume, attach it to
// a server, show the decoded ErrorInfo of a call that fails (attaching it a
// second time), detach it and delete it.
//
//   npm ci && node example.js [ADDRESS] [SERVER_ID]
//
// ADDRESS defaults to $VMATTACH_ADDRESS or 127.0.0.1:50051; SERVER_ID to the
// first server vmattach lists. Prints one JSON object per step; exits 1 when
// a step does not go as described.

const crypto = require('node:crypto');
const { connect, decodeStatus, errorInfo, grpc } = require('./index');

function step(name, value) {
  console.log(JSON.stringify({ step: name, ...value }));
}

async function main() {
  const [address, serverArg] = process.argv.slice(2);
  const client = connect(address || undefined);
  try {
    let serverId = serverArg;
    if (!serverId) {
      const { servers } = await client.servers.ListServers({ page_size: 1 });
      if (servers.length === 0) throw new Error(`vmattach at ${client.address} lists no server`);
      serverId = servers[0].server_id;
    }

    const name = `node-example-${crypto.randomBytes(4).toString('hex')}`;
    const volume = await client.controller.CreateVolume({ name, size_gb: 1 });
    step('create', { volume_id: volume.volume_id, name: volume.name, status: volume.status });

    const attachment = await client.servers.AttachVolume({ server_id: serverId, volume_id: volume.volume_id });
    step('attach', { server_id: serverId, device: attachment.device, state: attachment.state });

    try {
      await client.servers.AttachVolume({ server_id: serverId, volume_id: volume.volume_id });
      throw new Error('attaching the volume a second time succeeded');
    } catch (err) {
      if (err.code === undefined) throw err;
      const status = decodeStatus(err);
      step('attach again fails', {
        code: grpc.status[err.code],
        message: err.details,
        error_info: errorInfo(err),
        details: status ? status.details.map((d) => d['@type']) : [],
      });
    }

    await client.servers.DetachVolume({ server_id: serverId, volume_id: volume.volume_id });
    const detached = await client.controller.GetVolume({ volume_id: volume.volume_id });
    step('detach', { status: detached.status, attach_status: detached.attach_status });

    await client.controller.DeleteVolume({ volume_id: volume.volume_id });
    try {
      await client.controller.GetVolume({ volume_id: volume.volume_id });
      throw new Error('the volume is still there after DeleteVolume');
    } catch (err) {
      if (err.code !== grpc.status.NOT_FOUND) throw err;
      step('delete', { volume_id: volume.volume_id, then: errorInfo(err).reason });
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const info = errorInfo(err);
  console.error(`example failed: ${err.message}${info ? ` (reason ${info.reason})` : ''}`);
  process.exit(1);
});
