/**
 * chatd's HTTP API for users (docs/PROTOCOL.md section 7): groups, media
 * and the user's own devices, with the same tokens as MQTT.
 */

/** A group, as the server describes it. */
export interface Group {
  /** The group ID. */
  id: string;
  /** Every member, admins included. */
  members: string[];
  /** The members who may change the group. */
  admins: string[];
  /** Who created it. */
  creator?: string;
  /** Unix seconds. */
  created: number;
}

/** A stored upload: its id goes into a message. */
export interface Upload {
  /** The media ID to put in a message. */
  id: string;
  /** Its size in bytes. */
  size: number;
  /** The SHA-256 of its bytes, in hex. */
  sha256: string;
}

/** One of the user's devices. */
export interface Device {
  /** user or user/device. */
  client_id: string;
  /** Connected now, on any node. */
  online: boolean;
  /** Unix seconds; now when online. */
  last_seen: number;
  /** Queued messages it has not acknowledged. */
  waiting: number;
  /** A clean-session device, forgotten when it leaves. */
  transient: boolean;
}

/** A refusal of the HTTP API: its status and protocol error code. */
export class ApiError extends Error {
  constructor(
    /** The HTTP status. */
    readonly status: number,
    /** The protocol error code: not_authorized, unknown_group, too_large, ... */
    readonly code: string,
    reason: string,
  ) {
    super(`${status} ${code}: ${reason}`);
    this.name = "ApiError";
  }
}

/** Calls chatd's HTTP API as one user. */
export class ChatApi {
  /**
   * @param baseUrl the server's HTTP address, e.g. http://127.0.0.1:8080
   *   ("" in a page served by chatd itself)
   * @param token returns a valid token of the user, as for ChatClient
   */
  constructor(
    private readonly baseUrl: string,
    private readonly token: () => Promise<string>,
  ) {}

  /** Creates group id with members; the caller becomes a member and its admin. */
  createGroup(id: string, members: string[]): Promise<Group> {
    return this.json("POST", "/v1/groups", { id, members });
  }

  /** A group's members and admins (members only). */
  group(id: string): Promise<Group> {
    return this.json("GET", `/v1/groups/${encodeURIComponent(id)}`);
  }

  /** Adds user to group id (admins). */
  addMember(id: string, user: string): Promise<Group> {
    return this.json("PUT", `/v1/groups/${encodeURIComponent(id)}/members/${encodeURIComponent(user)}`);
  }

  /** Removes user from group id (admins, or the user itself). */
  removeMember(id: string, user: string): Promise<Group> {
    return this.json("DELETE", `/v1/groups/${encodeURIComponent(id)}/members/${encodeURIComponent(user)}`);
  }

  /** Deletes group id (admins). */
  async deleteGroup(id: string): Promise<void> {
    await this.call("DELETE", `/v1/groups/${encodeURIComponent(id)}`);
  }

  /** Uploads a file; put the returned id in a message. */
  async upload(body: Blob | Uint8Array, contentType = "application/octet-stream"): Promise<Upload> {
    const res = await this.call("POST", "/v1/media", body, contentType);
    return (await res.json()) as Upload;
  }

  /** Downloads an upload by its id. */
  async download(id: string): Promise<Blob> {
    const res = await this.call("GET", `/v1/media/${encodeURIComponent(id)}`);
    return res.blob();
  }

  /** The user's devices. */
  async devices(): Promise<Device[]> {
    return (await this.json<{ devices: Device[] }>("GET", "/v1/devices")).devices;
  }

  /** Removes one of the user's devices by client ID, closing its connection. */
  async removeDevice(clientId: string): Promise<void> {
    await this.call("DELETE", `/v1/devices/${clientId.split("/").map(encodeURIComponent).join("/")}`);
  }

  private async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.call(method, path, body === undefined ? undefined : JSON.stringify(body), "application/json");
    return (await res.json()) as T;
  }

  private async call(method: string, path: string, body?: BodyInit | Uint8Array, contentType?: string): Promise<Response> {
    const headers: Record<string, string> = { Authorization: `Bearer ${await this.token()}` };
    if (body !== undefined && contentType) headers["Content-Type"] = contentType;
    const res = await fetch(this.baseUrl + path, { method, headers, body: body as BodyInit | undefined });
    if (!res.ok) {
      let code = "http_error";
      let reason = res.statusText;
      try {
        const e = (await res.json()) as { error?: string; reason?: string };
        code = e.error ?? code;
        reason = e.reason ?? reason;
      } catch {
        // Not the API's JSON error: the status says it all.
      }
      throw new ApiError(res.status, code, reason);
    }
    return res;
  }
}
