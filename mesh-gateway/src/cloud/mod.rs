//! The bridge from the site to the cloud over MQTT (issue 14). Landed so far: the
//! store-and-forward queue ([`queue`]); the MQTT client, the topics and the `[cloud]` section come
//! next.

pub mod queue;
