import asyncio
from urllib.parse import parse_qs, urlsplit

import sfrtr
from sfrtr.oauth import pkce

CALLBACK = "https://app.example/callback"  # your app's OAuth callback URL


async def main() -> None:
    config = sfrtr.OAuthConfig(
        client_id="sfrtr-emulator-client",  # printed by `sfrtr emulator`
        client_secret=sfrtr.Secret("sfrtr-emulator-secret"),
        login_url="http://127.0.0.1:8765",
        instance_policy=sfrtr.InstanceUrlPolicy.for_emulator(),  # its http://127.0.0.1 URLs
    )
    async with sfrtr.OAuthClient(config) as oauth:
        # The web-server flow: the customer's browser goes to `url` and comes back to
        # CALLBACK with a code (the emulator approves at once: login_hint names the org).
        verifier = pkce.make_verifier()
        url = oauth.authorize_url(redirect_uri=CALLBACK, state="any", login_hint="acme",
                                  code_challenge=pkce.challenge(verifier))
        async with oauth.session.get(url, allow_redirects=False) as answer:
            code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
        grant = await oauth.exchange_code(code, redirect_uri=CALLBACK, code_verifier=verifier)

        async with sfrtr.TokenManager(oauth, sfrtr.MemoryStore()) as manager:
            await manager.connect("acme", grant)  # stores the first grant
            token = await manager.token("acme")  # a fresh access token; no I/O when cached
            creds = await manager.refresh("acme", stale=token)  # after a 401: newer, once
            assert creds.access_token != token
            page = await sfrtr.Client("acme", manager).query("SELECT Id, Name FROM Account")
            print(f"{page.total_size} accounts; refreshed once")


asyncio.run(main())
